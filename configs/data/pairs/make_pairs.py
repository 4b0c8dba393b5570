#!/usr/bin/env python3
"""Generate the sentence-pair example set (train.jsonl / dev.jsonl).

Each line of TRIPLES is "anchor | paraphrase | different", written for the
tandem project. The paraphrase restates the anchor in other words; the
"different" sentence stays on the same topic (often with heavy word overlap)
but means something else. Every triple yields one "paraphrase" pair and one
"different" pair, so the set is exactly balanced. Whole triples are assigned
to train or dev, so no sentence appears in both splits.
Run: python3 make_pairs.py   (writes next to this script)
"""
import json
import os
import random

TRIPLES = """
The train to the airport leaves every twenty minutes. | Trains depart for the airport three times an hour. | The train to the airport takes twenty minutes.
She finished the report before lunch. | The report was done by her before midday. | She started the report after lunch.
The museum is closed on Mondays. | On Mondays the museum does not open. | The museum is free on Mondays.
He bought a new bicycle last week. | Last week he purchased a new bike. | He sold his old bicycle last week.
The soup needs more salt. | The soup is not salty enough. | The soup has too much salt.
Our flight was delayed by two hours. | The plane took off two hours late. | Our flight was cancelled two hours before departure.
The children are playing in the garden. | The kids are outside playing in the garden. | The children are planting flowers in the garden.
It rained all night in the city. | The city had rain throughout the night. | It rained all night in the mountains, but the city stayed dry.
The shop opens at nine in the morning. | The store starts business at 9 a.m. | The shop closes at nine in the evening.
My sister is older than me. | I am younger than my sister. | My sister is younger than me.
The meeting has been moved to Thursday. | The meeting will now take place on Thursday. | The meeting on Thursday has been cancelled.
The bridge was built over a century ago. | The bridge is more than a hundred years old. | The bridge will be rebuilt next century.
The cat is sleeping on the sofa. | The sofa has a cat asleep on it. | The cat is scratching the sofa.
He rarely drinks coffee. | He hardly ever has coffee. | He drinks coffee every morning.
The library has extended its opening hours. | The library now stays open longer. | The library has reduced its opening hours.
Tickets for the concert sold out in an hour. | All the concert tickets were gone within sixty minutes. | Tickets for the concert went on sale an hour ago.
The doctor told him to rest for a week. | He was advised by the doctor to take a week of rest. | The doctor told him he could return to work this week.
The restaurant only serves vegetarian food. | No meat is served at the restaurant. | The restaurant is famous for its grilled meat.
She learned to swim when she was five. | She could swim by the age of five. | She taught her five-year-old to swim.
The river flooded the lower part of town. | Water from the river covered the low-lying streets. | The river dried up in the lower part of town.
The company hired twenty new employees. | Twenty people joined the company as new staff. | The company laid off twenty employees.
The bus was full, so we walked. | We went on foot because there was no room on the bus. | The bus was empty, so we took it.
This phone is cheaper than that one. | That phone costs more than this one. | This phone is more expensive than that one.
The park is a short walk from the station. | You can walk from the station to the park in a few minutes. | The park is a long drive from the station.
The exam was easier than we expected. | We found the exam less difficult than we had feared. | The exam was harder than we expected.
The baby finally fell asleep at midnight. | It was midnight before the baby went to sleep. | The baby woke up at midnight.
The hotel offers free breakfast to all guests. | Every guest gets breakfast at no charge. | The hotel charges guests for breakfast.
They postponed the match because of the storm. | The storm caused the match to be put off. | They played the match despite the storm.
Most students passed the test. | The majority of the class got a passing grade. | Most students failed the test.
The road is closed for repairs. | Repairs have closed the road to traffic. | The road was reopened after repairs.
He lives on the third floor. | His flat is on the third storey. | He works on the third floor.
The teacher praised her essay. | Her essay received praise from the teacher. | The teacher criticised her essay.
We ran out of milk this morning. | There was no milk left this morning. | We bought extra milk this morning.
The film starts at eight o'clock. | The movie begins at 8 p.m. | The film ends at eight o'clock.
The team won the final by two goals. | The team took the final with a two-goal margin. | The team lost the final by two goals.
Winters here are long and cold. | The cold season here lasts a long time and is freezing. | Winters here are short and mild.
She forgot to lock the door. | She left the door unlocked by mistake. | She remembered to lock the door.
The price of bread went up last month. | Bread became more expensive last month. | The price of bread went down last month.
My grandfather grew up on a farm. | My grandfather spent his childhood on a farm. | My grandfather bought a farm after he retired.
The package arrived a day early. | The parcel was delivered one day ahead of schedule. | The package arrived a day late.
The lake freezes every winter. | Each winter the lake turns to ice. | The lake never freezes in winter.
He apologised for being late. | He said sorry for arriving late. | He complained that we were late.
The new policy applies to all staff. | Every employee is covered by the new policy. | The new policy applies only to managers.
The recipe calls for two eggs. | You need two eggs for this recipe. | The recipe calls for no eggs.
The garden looks beautiful in spring. | In springtime the garden is lovely. | The garden looks bare in spring.
She speaks three languages fluently. | She is fluent in three languages. | She is learning three languages.
The dog barked at the postman. | The postman was barked at by the dog. | The postman shouted at the dog.
Prices at the market are lower in the evening. | Things at the market cost less in the evening. | Prices at the market are higher in the evening.
They moved to the city ten years ago. | They have lived in the city for a decade. | They left the city ten years ago.
The printer is out of paper. | There is no paper left in the printer. | The printer is out of ink.
I cannot attend the party on Saturday. | I will not be able to come to Saturday's party. | I am hosting a party on Saturday.
The weather will improve tomorrow. | Tomorrow the weather is going to get better. | The weather will get worse tomorrow.
He repaired the roof himself. | He fixed the roof without anyone's help. | He paid someone to repair the roof.
The bakery sells out of bread by noon. | By midday the bakery has no bread left. | The bakery starts baking bread at noon.
Our neighbours are very quiet. | The people next door make very little noise. | Our neighbours are very noisy.
The vaccine is given in two doses. | Two injections are needed for the vaccine. | The vaccine is given in a single dose.
She was born in a small village. | Her birthplace is a small village. | She lives in a small village.
The train was cancelled due to snow. | Snow led to the cancellation of the train. | The train ran on time despite the snow.
The course lasts six weeks. | The course runs for a month and a half. | The course starts in six weeks.
Water boils at a lower temperature on mountains. | At high altitude, water reaches boiling point sooner. | Water freezes at a lower temperature on mountains.
He gave up smoking last year. | He quit smoking a year ago. | He started smoking last year.
The store accepts only cash. | Card payments are not accepted at the store. | The store does not accept cash.
The tree fell during the storm. | The storm knocked the tree down. | The tree survived the storm.
I have never been to Japan. | I have not visited Japan even once. | I have been to Japan twice.
The castle attracts thousands of visitors each year. | Every year thousands of tourists come to see the castle. | The castle is closed to visitors this year.
The kitchen is too small for a dishwasher. | There is not enough space in the kitchen for a dishwasher. | The kitchen already has a dishwasher.
Ravi arrived before the speech began. | Ravi got there ahead of the start of the speech. | Ravi left before the speech began.
The cake needs to bake for forty minutes. | Bake the cake for forty minutes. | The cake needs to cool for forty minutes.
The hospital is looking for more nurses. | The hospital wants to hire additional nurses. | The hospital has too many nurses.
Nobody answered the phone. | The phone rang but no one picked up. | Everybody tried to answer the phone.
The festival takes place every August. | Each August the festival is held. | The festival took place once, in August.
The lecture was cancelled because the professor was ill. | The professor's illness meant the lecture did not happen. | The professor was ill but gave the lecture anyway.
She prefers tea to coffee. | She likes tea more than coffee. | She prefers coffee to tea.
The town has two primary schools. | There are two primary schools in the town. | The town needs two more primary schools.
The wallet was found under the seat. | Someone discovered the wallet beneath the seat. | The wallet was lost under the seat.
The elevator is out of order. | The lift is not working. | The elevator was repaired this morning.
The population of the city has doubled. | The city now has twice as many residents. | The population of the city has halved.
He left his umbrella on the bus. | His umbrella was left behind on the bus. | He found an umbrella on the bus.
The soup is served with bread. | Bread comes with the soup. | The soup is served instead of bread.
Maria is the tallest player on the team. | No one on the team is taller than Maria. | Maria is the shortest player on the team.
They watched the sunrise from the beach. | From the beach, they saw the sun come up. | They watched the sunset from the beach.
The car would not start this morning. | This morning the car failed to start. | The car broke down this evening.
The author wrote the novel in six months. | It took the author half a year to write the novel. | The author read the novel in six months.
Parking is free after six in the evening. | You do not have to pay for parking after 6 p.m. | Parking is not allowed after six in the evening.
The children were excited about the trip. | The trip made the children eager and happy. | The children were bored by the trip.
He is allergic to peanuts. | Peanuts give him an allergic reaction. | He is allergic to cats.
The plant needs water once a week. | Water the plant weekly. | The plant needs sunlight once a week.
The road to the village is very narrow. | Only a narrow road leads to the village. | The road to the village was widened.
We arrived at the hotel after dark. | It was already dark when we reached the hotel. | We left the hotel after dark.
The tickets cost ten dollars each. | Each ticket is priced at ten dollars. | Ten tickets cost a dollar each.
The shop on the corner closed down last year. | Last year the corner shop went out of business. | The shop on the corner opened last year.
She called her mother every Sunday. | Every Sunday she phoned her mum. | Her mother called her every Sunday.
The computer saves the file automatically. | The file is saved by the computer without you doing anything. | The computer deletes the file automatically.
The stadium holds fifty thousand people. | Fifty thousand spectators fit in the stadium. | Fifty thousand people attended the stadium's opening.
The milk has gone sour. | The milk has turned bad. | The milk is fresh.
The boat sank near the island. | The boat went down close to the island. | The boat reached the island safely.
The company's profits rose this quarter. | This quarter the company earned more money. | The company's profits fell this quarter.
I slept badly last night. | I did not get a good night's sleep. | I slept very well last night.
The guide spoke slowly so everyone understood. | Everyone could follow because the guide talked slowly. | The guide spoke so fast that nobody understood.
The bakery is next to the bank. | The bank and the bakery are side by side. | The bakery is across the city from the bank.
The lesson was cancelled because of the holiday. | There was no lesson due to the holiday. | The lesson was held on the holiday.
He carried the heavy box upstairs. | He took the heavy box up the stairs. | He carried the heavy box down to the basement.
The volcano erupted in 1980. | There was an eruption of the volcano in 1980. | The volcano has been quiet since 1980.
The window faces the sea. | The window looks out over the sea. | The window faces the car park.
Her brother repairs old clocks. | Fixing old clocks is what her brother does. | Her brother collects old clocks.
The soup tastes better the next day. | The soup is even more delicious the day after. | The soup should be eaten on the same day.
Chen missed the last bus home. | The last bus home left without Chen. | Chen caught the last bus home.
Most of the guests left early. | The majority of guests went home early. | Most of the guests stayed late.
The painting was sold for a record price. | No painting had ever sold for as much. | The painting was stolen from the museum.
The hike took longer than planned. | We needed more time for the hike than we expected. | The hike was shorter than planned.
The school is closed because of the heat. | The heat has forced the school to close. | The school stays open despite the heat.
The pharmacy is open twenty-four hours. | The pharmacy never closes. | The pharmacy is open for four hours a day.
He borrowed my ladder. | I lent him my ladder. | He returned my ladder.
The ice on the pond is too thin to walk on. | Walking on the pond is unsafe because the ice is thin. | The ice on the pond is thick enough to skate on.
The results will be announced next week. | Next week they will publish the results. | The results were announced last week.
The bread is baked fresh every morning. | Every morning the bread is freshly made. | The bread is delivered frozen every morning.
The museum allows photography without flash. | Visitors may take pictures in the museum as long as they do not use a flash. | The museum does not allow any photography.
Aisha finished the marathon in under four hours. | It took Aisha less than four hours to complete the marathon. | Aisha trained for the marathon for four months.
The farmers harvested the apples in October. | The apple harvest took place in October. | The farmers planted the apple trees in October.
The new bridge shortens the journey by half an hour. | Thanks to the new bridge, the trip takes thirty minutes less. | The new bridge took half an hour to cross because of traffic.
기차가 예정보다 십 분 늦게 도착했다. | 열차가 원래 시간보다 십 분 늦게 들어왔다. | 기차가 예정보다 십 분 일찍 도착했다.
이 식당은 월요일마다 문을 닫는다. | 월요일에는 이 식당이 영업을 하지 않는다. | 이 식당은 월요일에 가장 손님이 많다.
동생은 나보다 키가 크다. | 나는 동생보다 키가 작다. | 동생은 나보다 키가 작다.
회의가 목요일로 미뤄졌다. | 회의 날짜가 목요일로 변경되었다. | 목요일 회의가 취소되었다.
어제는 하루 종일 비가 내렸다. | 어제는 아침부터 밤까지 비가 왔다. | 어제는 하루 종일 맑았다.
그는 커피를 거의 마시지 않는다. | 그는 커피를 잘 안 마신다. | 그는 매일 아침 커피를 마신다.
도서관 운영 시간이 늘어났다. | 도서관이 전보다 더 오래 문을 연다. | 도서관 운영 시간이 줄어들었다.
콘서트 표가 한 시간 만에 다 팔렸다. | 한 시간 안에 공연 표가 매진되었다. | 콘서트 표 판매가 한 시간 뒤에 시작된다.
이 휴대전화는 저것보다 싸다. | 저 휴대전화가 이것보다 비싸다. | 이 휴대전화는 저것보다 비싸다.
그녀는 보고서를 점심 전에 끝냈다. | 그녀는 점심시간이 되기 전에 보고서를 마쳤다. | 그녀는 점심 후에 보고서를 쓰기 시작했다.
아이들이 마당에서 놀고 있다. | 아이들이 마당에 나가 놀고 있다. | 아이들이 마당에서 꽃을 심고 있다.
이 가게는 현금만 받는다. | 이 가게에서는 카드로 계산할 수 없다. | 이 가게는 현금을 받지 않는다.
시험이 생각보다 쉬웠다. | 시험이 예상했던 것보다 어렵지 않았다. | 시험이 생각보다 어려웠다.
그는 작년에 담배를 끊었다. | 그는 일 년 전에 금연에 성공했다. | 그는 작년에 담배를 피우기 시작했다.
공원은 역에서 걸어서 오 분 거리이다. | 역에서 공원까지 걸어서 오 분이면 간다. | 공원은 역에서 차로 한 시간 거리이다.
우유가 다 떨어졌다. | 집에 우유가 하나도 남지 않았다. | 우유를 넉넉히 사 두었다.
그 다리는 백 년도 더 전에 지어졌다. | 그 다리는 지어진 지 백 년이 넘었다. | 그 다리는 내년에 새로 지어질 예정이다.
아기가 자정이 되어서야 잠들었다. | 아기는 밤 열두 시가 넘어서 겨우 잠이 들었다. | 아기가 자정에 잠에서 깼다.
이 호텔은 모든 손님에게 아침 식사를 무료로 제공한다. | 이 호텔에 묵으면 누구나 공짜로 아침을 먹을 수 있다. | 이 호텔은 아침 식사 비용을 따로 받는다.
폭풍 때문에 경기가 연기되었다. | 경기가 폭풍으로 인해 뒤로 미뤄졌다. | 폭풍에도 불구하고 경기가 그대로 열렸다.
대부분의 학생이 시험에 합격했다. | 학생 중 다수가 시험을 통과했다. | 대부분의 학생이 시험에 떨어졌다.
그녀는 세 가지 언어를 유창하게 한다. | 그녀는 세 개 언어에 능통하다. | 그녀는 세 가지 언어를 배우는 중이다.
엘리베이터가 고장 났다. | 승강기가 작동하지 않는다. | 엘리베이터가 오늘 아침 수리되었다.
나는 어젯밤에 잠을 잘 못 잤다. | 어젯밤에 푹 자지 못했다. | 나는 어젯밤에 아주 푹 잤다.
빵집은 은행 바로 옆에 있다. | 은행과 빵집이 나란히 붙어 있다. | 빵집은 은행에서 멀리 떨어져 있다.
"""


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    triples = []
    for line in TRIPLES.strip().splitlines():
        parts = [p.strip() for p in line.split("|")]
        assert len(parts) == 3 and all(parts), line
        triples.append(parts)
    sents = [s for t in triples for s in t]
    assert len(sents) == len(set(sents)), "duplicate sentence"
    rng = random.Random(20240612)
    rng.shuffle(triples)
    n_dev = 25
    splits = {"dev.jsonl": triples[:n_dev], "train.jsonl": triples[n_dev:]}
    for name, group in splits.items():
        rows = []
        for i, (a, p, d) in enumerate(group):
            # Alternate which side the anchor sits on so order carries no signal.
            if i % 2 == 0:
                rows.append({"text_a": a, "text_b": p, "label": "paraphrase"})
                rows.append({"text_a": d, "text_b": a, "label": "different"})
            else:
                rows.append({"text_a": p, "text_b": a, "label": "paraphrase"})
                rows.append({"text_a": a, "text_b": d, "label": "different"})
        rng.shuffle(rows)
        with open(os.path.join(here, name), "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
